"""Data pipeline: text corpora → tokenizer → Megatron-style indexed datasets → packed,
resumable training batches. `mamba-train prep` (prep.py) runs the first three."""

from mamba_train.data.corpus import CorpusError, build_local_corpus, read_documents, read_jsonl
from mamba_train.data.indexed import (DataError, IndexedDataset, IndexedDatasetError, IndexedDatasetWriter,
                                      token_dtype_for_vocab)
from mamba_train.data.loader import PackedSamples, TrainLoader
from mamba_train.data.tokenizer import (HFTokenizer, SentencePieceTokenizer, Tokenizer, TokenizerError,
                                        load_tokenizer, train_sentencepiece)

__all__ = [
    "CorpusError", "DataError", "HFTokenizer", "IndexedDataset", "IndexedDatasetError", "IndexedDatasetWriter",
    "PackedSamples", "SentencePieceTokenizer", "Tokenizer", "TokenizerError", "TrainLoader", "build_local_corpus",
    "load_tokenizer", "read_documents", "read_jsonl", "token_dtype_for_vocab", "train_sentencepiece",
]
