"""`mamba-train prep RECIPE.yaml`: corpus → tokenizer → indexed train/valid/test datasets.

Steps: build the local corpus (if the recipe asks for one) → train a sentencepiece
tokenizer (or copy an existing one) → tokenize the sources into shards in worker
processes (shards.py) → merge the shards into `train`, `valid` (and `test`) indexed
datasets (EOD after every document, .docs.npz sidecar) and `prep.json`.

The final files are written into a temporary directory beside the output and renamed
into place at the end, so a failure leaves an existing output untouched; finished
shards are kept in `.<out>.partial/` so a rerun resumes. The split is a hash of (seed,
document index): the same documents land in the same split whatever the worker count,
shard grouping or run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mamba_train.config import ConfigError, from_mapping, parse_yaml
from mamba_train.data.corpus import SkippedRecords
from mamba_train.data.local_corpus import LOCAL_SUBSETS, build_local_corpus
from mamba_train.data.indexed import DataError, IndexedDataset, token_dtype_for_vocab
from mamba_train.data.shards import merge, split_of_documents, tokenize_sources
from mamba_train.data.sources import expand, read_source
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
    # .jsonl / .jsonl.zst / .txt / .parquet paths or globs, `save_to_disk` dataset
    # directories, or `hf:NAME[@split]` (datasets.load_dataset, streamed)
    files: list[str] = field(default_factory=list)


@dataclass
class TokenizerRecipe:
    path: str | None = None  # an existing .model or tokenizer.json, copied as is; else train:
    vocab_size: int = 4096
    model_type: str = "bpe"
    sample_docs: int = 20000
    byte_fallback: bool = True  # unknown characters become byte pieces, never <unk>
    character_coverage: float = 0.9995


@dataclass
class Recipe:
    output: str = "data/quickstart"
    sources: SourcesRecipe = field(default_factory=SourcesRecipe)
    tokenizer: TokenizerRecipe = field(default_factory=TokenizerRecipe)
    valid_fraction: float = 0.02
    test_fraction: float = 0.0
    seed: int = 1234
    chunk_bytes: int = 1 << 20  # text a worker tokenizes at a time: bounds its memory
    shard_bytes: int = 256 << 20  # small sources are grouped into shards of about this size on disk
    skip_bad_records: bool = False  # count and skip bad lines/rows instead of stopping at the first

    def validate(self) -> None:
        if self.sources.local_corpus is None and not self.sources.files:
            raise PrepError("sources: give a local_corpus block, files, or both")
        if self.sources.local_corpus is not None:
            corpus = self.sources.local_corpus
            if not 0 < corpus.max_mb < float("inf"):
                raise PrepError(f"sources.local_corpus.max_mb: expected a finite positive number, "
                                f"found {corpus.max_mb}")
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
            if not 0 < self.tokenizer.character_coverage <= 1:
                raise PrepError(f"tokenizer.character_coverage: expected a number in (0, 1], "
                                f"found {self.tokenizer.character_coverage}")
        if not 0 <= self.valid_fraction < 1:
            raise PrepError(f"valid_fraction: expected a number in [0, 1), found {self.valid_fraction}")
        if not 0 <= self.test_fraction < 1 - self.valid_fraction:
            raise PrepError(f"test_fraction: expected a number in [0, 1 - valid_fraction), found {self.test_fraction}")
        for name in ("chunk_bytes", "shard_bytes"):
            if getattr(self, name) <= 0:
                raise PrepError(f"{name}: expected a positive integer, found {getattr(self, name)}")


def load_recipe(path: str | os.PathLike) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise PrepError(f"recipe not found: {path}")
    try:
        raw = parse_yaml(path.read_text(encoding="utf-8"), str(path)) or {}
    except ConfigError as error:  # names the file already
        raise PrepError(str(error)) from None
    try:
        if not isinstance(raw, dict):
            raise PrepError(f"expected a mapping at the top level (output:, sources:, tokenizer:, ...), "
                            f"found a {type(raw).__name__}: {raw!r:.60}")
        if isinstance(raw.get("sources"), list):  # shorthand: `sources: [a.jsonl.zst, b/*.txt]`
            raw["sources"] = {"files": raw["sources"]}
        recipe = from_mapping(Recipe, raw)
        recipe.validate()
    except (ConfigError, PrepError) as error:
        raise PrepError(f"{path}: {error}") from None
    return recipe


# Preparing ------------------------------------------------------------------------------

def prepare(recipe: Recipe, out: str | os.PathLike | None = None, force: bool = False,
            workers: int | None = None, progress: bool | None = None) -> dict:
    """Run the recipe into `out` (default recipe.output); returns the prep.json summary.

    Work in progress lives in `.<out>.partial/` beside the output (local corpus,
    tokenizer, one finished shard per source group) and survives a failure or an
    interrupt, so rerunning the same recipe resumes where it stopped; a different recipe
    starts it afresh. It is removed once the output is in place."""
    recipe.validate()
    out = Path(out or recipe.output)
    recipe_json = json.loads(json.dumps(dataclasses.asdict(recipe)))
    if out.exists() and not force:
        built = _read_json(out / "prep.json")
        if built is not None and _same_recipe(built.get("recipe"), recipe_json):
            _log(f"{out} is up to date (built from this recipe); --force rebuilds it")
            return built
        raise PrepError(f"{out} already exists and was not built from this recipe; pass --force to replace it")
    # Checked here, not in validate(): a recipe such as pile.yaml loads on a machine without
    # the tokenizer; but a missing one must not surface only after the corpus is built.
    if recipe.tokenizer.path is not None and not Path(recipe.tokenizer.path).exists():
        raise PrepError(f"tokenizer.path: {recipe.tokenizer.path} does not exist (expected a sentencepiece .model, "
                        "a tokenizer.json or a directory holding one; leave tokenizer.path out to train one)")
    workers = workers if workers is not None else os.cpu_count() or 1
    started = time.perf_counter()
    out.parent.mkdir(parents=True, exist_ok=True)
    work = out.parent / f".{out.name}.partial"
    if work.exists() and _read_json(work / "recipe.json") != recipe_json:
        _log(f"{work} holds work for another recipe: starting afresh")
        shutil.rmtree(work)
    elif work.exists():
        _log(f"resuming from {work}")
    work.mkdir(exist_ok=True)
    (work / "recipe.json").write_text(json.dumps(recipe_json, indent=1))
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        summary = _prepare_into(recipe, work, tmp, workers, progress)
        summary["seconds"] = round(time.perf_counter() - started, 2)
        (tmp / "prep.json").write_text(json.dumps(summary, indent=1) + "\n")
        _swap_into_place(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(work, ignore_errors=True)
    return summary


def _same_recipe(built: dict | None, recipe_json: dict) -> bool:
    """Whether an output's recorded recipe is this one, reading keys added since it was
    written as their defaults (an older quickstart output stays up to date)."""
    if not isinstance(built, dict):
        return False
    try:
        filled = from_mapping(Recipe, built)
    except ConfigError:
        return False
    return json.loads(json.dumps(dataclasses.asdict(filled))) == recipe_json


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _prepare_into(recipe: Recipe, work: Path, tmp: Path, workers: int, progress: bool | None) -> dict:
    sources, corpus = [], None
    if recipe.sources.local_corpus is not None:
        corpus = _local_corpus(recipe.sources.local_corpus, work)
        sources += [work / "corpus" / entry["file"] for entry in corpus["subsets"].values()]
    try:
        sources += expand(recipe.sources.files)
    except DataError as error:
        raise PrepError(f"sources.files: {error}") from None

    if recipe.tokenizer.path is not None:
        tokenizer = _copy_tokenizer(Path(recipe.tokenizer.path), work)
    elif (work / "tokenizer.model").is_file():  # trained before an interruption
        tokenizer = load_tokenizer(work / "tokenizer.model")
    else:
        _log(f"training a sentencepiece {recipe.tokenizer.model_type} tokenizer "
             f"(vocab {recipe.tokenizer.vocab_size}) ...")
        tokenizer = _train(recipe, sources, work)
    dtype = token_dtype_for_vocab(tokenizer.vocab_size)
    _log(f"tokenizing {len(sources)} source{'s' if len(sources) != 1 else ''} with up to {workers} "
         f"worker process{'es' if workers > 1 else ''} ...")
    shards = tokenize_sources(sources, tokenizer.path, work, dtype, workers, recipe.chunk_bytes,
                              recipe.shard_bytes, recipe.skip_bad_records, progress)
    total = sum(shard["documents"] for shard in shards)
    if not total:
        raise PrepError(f"no documents in the sources ({_describe(sources)})")
    _log(f"merging {len(shards)} shard{'s' if len(shards) != 1 else ''} into the splits ...")
    chosen = merge(shards, tmp, dtype, recipe.seed, recipe.valid_fraction, recipe.test_fraction)
    for name, indices in chosen.items():
        if not indices.size:
            raise PrepError(f"no documents for the {name} split among {total} (valid_fraction="
                            f"{recipe.valid_fraction}, test_fraction={recipe.test_fraction}); change them or add data")
    for name in tokenizer_files(tokenizer.path):
        shutil.copyfile(tokenizer.path.parent / name, tmp / name)
    if corpus is not None:
        os.replace(work / "corpus", tmp / "corpus")
    skipped = {"count": sum(s["skipped"] for s in shards),
               "examples": [e for s in shards for e in s["skipped_examples"]][:10]}
    if skipped["count"]:
        _log(f"skipped {skipped['count']} bad record(s) (skip_bad_records: true), e.g. {skipped['examples'][0]}")
    return {
        "tokenizer": {"file": tokenizer.path.name, "kind": type(tokenizer).__name__,
                      "vocab_size": tokenizer.vocab_size, "eod_id": tokenizer.eod_id},
        "token_dtype": str(dtype),
        "splits": {name: split_summary(IndexedDataset(tmp / name)) for name in chosen},
        "subsets": sorted({name for shard in shards for name in shard["subsets"]}),
        "sources": [str(s.relative_to(work)) if isinstance(s, Path) and s.is_relative_to(work) else str(s)
                    for s in sources],
        "shards": len(shards),
        "skipped_records": skipped,
        "empty_documents": sum(s["empty"] for s in shards),
        "local_corpus": corpus,
        "recipe": dataclasses.asdict(recipe),
    }


def _local_corpus(local: LocalCorpusRecipe, work: Path) -> dict:
    built = _read_json(work / "corpus.json")
    if built is not None and (work / "corpus").is_dir():
        return built
    _log(f"building the local corpus ({local.max_mb} MB) ...")
    corpus = build_local_corpus(work / "corpus", local.max_mb, local.subsets)
    (work / "corpus.json").write_text(json.dumps(corpus))
    return corpus


def _train(recipe: Recipe, sources: list, work: Path):
    config = recipe.tokenizer
    skipped = SkippedRecords() if recipe.skip_bad_records else None  # counted in the tokenizing pass
    documents = _Counter(text for source in sources for text, _ in read_source(source, skipped) if text)
    try:
        return train_sentencepiece(documents, work / "tokenizer", config.vocab_size,
                                   model_type=config.model_type, sample_docs=config.sample_docs, seed=recipe.seed,
                                   byte_fallback=config.byte_fallback,
                                   character_coverage=config.character_coverage)
    except DataError:
        if documents.count == 0:
            raise PrepError(f"no documents in the sources ({_describe(sources)})") from None
        raise


def tokenizer_files(path: Path) -> list[str]:
    """The tokenizer's file and, for a tokenizer.json, the config that names its EOS."""
    names = [path.name]
    if path.suffix == ".json" and (path.parent / "tokenizer_config.json").is_file():
        names.append("tokenizer_config.json")
    return names


def _copy_tokenizer(path: Path, work: Path):
    source = load_tokenizer(path).path  # resolves a directory to its tokenizer file
    name = "tokenizer.model" if source.suffix == ".model" else "tokenizer.json"
    shutil.copyfile(source, work / name)
    if "tokenizer_config.json" in tokenizer_files(source):
        shutil.copyfile(source.parent / "tokenizer_config.json", work / "tokenizer_config.json")
    return load_tokenizer(work / name)


def _in_valid(seed: int, index: int, fraction: float) -> bool:
    """The per-document coin of the split (see shards.split_of_documents), for one document."""
    return bool(split_of_documents(seed, index, 1, fraction, 0.0)[0] == 1)


# Bookkeeping ------------------------------------------------------------------------------

class _Counter:
    """Passes an iterator through and counts it (the document total for the progress bar)."""

    def __init__(self, items):
        self._items, self.count = items, 0

    def __iter__(self):
        for item in self._items:
            self.count += 1
            yield item


def split_summary(dataset: IndexedDataset) -> dict:
    """Documents, tokens and UTF-8 bytes of a split, overall and per subset (from its sidecar)."""
    lengths = dataset.doc_lengths.astype(np.int64)
    summary = {"documents": len(dataset), "tokens": int(lengths.sum()), "utf8_bytes": int(dataset.utf8_bytes.sum()),
               "subsets": {}}
    for i, name in enumerate(dataset.subset_names):
        mask = dataset.subset_ids == i
        summary["subsets"][name] = {"documents": int(mask.sum()), "tokens": int(lengths[mask].sum()),
                                    "utf8_bytes": int(dataset.utf8_bytes[mask].sum())}
    return summary


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
                        help="tokenizer processes, one shard each at a time (default: one per CPU core)")
    parser.add_argument("--skip-bad-records", action="store_true",
                        help="count and skip invalid lines/rows (reported in prep.json) instead of stopping")


def run(args: argparse.Namespace) -> int:
    if args.workers is not None and args.workers < 1:  # None (not given): one per CPU core
        raise PrepError(f"--workers: expected a positive number of processes, found {args.workers} "
                        "(leave it out for one per CPU core)")
    recipe = load_recipe(args.recipe)
    if getattr(args, "skip_bad_records", False):
        recipe.skip_bad_records = True
    out = Path(args.out or recipe.output)
    summary = prepare(recipe, out, force=args.force, workers=args.workers)
    for name, split in summary["splits"].items():
        print(f"{out}/{name}: {split['documents']:,} documents, {split['tokens']:,} tokens, "
              f"{split['utf8_bytes'] / 1e6:.1f} MB of text")
    print(f"{out}/{summary['tokenizer']['file']}: vocab {summary['tokenizer']['vocab_size']}, "
          f"eod {summary['tokenizer']['eod_id']} | {summary['seconds']} s")
    if summary["skipped_records"]["count"]:
        print(f"skipped {summary['skipped_records']['count']} bad records (see prep.json)")
    return 0
