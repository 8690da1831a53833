"""Data pipeline: text corpora → tokenizer → Megatron-style indexed datasets → packed,
resumable training batches. `mamba-train prep` (prep.py) runs the first three.

The loader and blends (which need torch) are imported on first use, so the tokenizing
worker processes of `prep` start without importing torch (seconds per start on a busy
machine)."""

from mamba_train.data.corpus import CorpusError, SkippedRecords, read_documents, read_jsonl
from mamba_train.data.indexed import (DataError, IndexedDataset, IndexedDatasetError, IndexedDatasetWriter,
                                      token_dtype_for_vocab)
from mamba_train.data.local_corpus import build_local_corpus
from mamba_train.data.tokenizer import (HFTokenizer, SentencePieceTokenizer, Tokenizer, TokenizerError,
                                        load_tokenizer, train_sentencepiece)

_LAZY = {"PackedSamples": "loader", "TrainLoader": "loader", "BlendedSamples": "blend", "parse_blend": "blend",
         "build_train_samples": "build", "index_cache_dir": "build"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"mamba_train.data.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'mamba_train.data' has no attribute {name!r}")


__all__ = [
    "BlendedSamples", "CorpusError", "DataError", "HFTokenizer", "IndexedDataset", "IndexedDatasetError",
    "IndexedDatasetWriter", "PackedSamples", "SentencePieceTokenizer", "SkippedRecords", "Tokenizer",
    "TokenizerError", "TrainLoader", "build_local_corpus", "build_train_samples", "index_cache_dir", "load_tokenizer",
    "parse_blend", "read_documents", "read_jsonl", "token_dtype_for_vocab", "train_sentencepiece",
]
