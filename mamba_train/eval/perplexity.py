"""Token perplexity and bits-per-byte of a model on an indexed dataset, overall and per
subset (the Pile paper's table).

The dataset's token stream (documents with their EOD) is read in windows, carrying the
recurrent state from window to window, so every document is scored as if it were read
whole, with no sliding-window overlap: the Mamba advantage over attention. `seq_idx`
resets the state at each document start.

Each prediction is charged to the document of the token it predicts, so a document's
loss covers its own tokens and its EOD; bits-per-byte divides the summed loss by the
documents' UTF-8 bytes: bpb = loss_nats · tokens / (bytes · ln 2).
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import numpy as np
import torch
import torch.nn.functional as F

from mamba_train.data import IndexedDataset


@torch.no_grad()
def evaluate(model, dataset: IndexedDataset, window: int = 2048, max_tokens: int | None = None,
             device: torch.device | str = "cpu", autocast_dtype: torch.dtype | None = None) -> dict:
    device = torch.device(device)
    was_training = model.training
    model.eval()
    doc_offsets = np.asarray(dataset.doc_offsets, dtype=np.int64)  # token offset of each document
    n_tokens = dataset.num_tokens if max_tokens is None else min(dataset.num_tokens, max_tokens + 1)
    stream = dataset.token_stream()
    n_docs = len(doc_offsets)
    loss_per_doc = np.zeros(n_docs, dtype=np.float64)
    tokens_per_doc = np.zeros(n_docs, dtype=np.int64)
    states = None
    amp = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else nullcontext()
    for start in range(0, n_tokens - 1, window):
        stop = min(start + window, n_tokens - 1)
        chunk = torch.from_numpy(np.asarray(stream[start:stop + 1], dtype=np.int64)).to(device)
        doc_ids = np.searchsorted(doc_offsets, np.arange(start, stop + 1), side="right") - 1
        seq_idx = torch.from_numpy(doc_ids[:-1].astype(np.int32)).to(device)[None]
        if start > 0 and doc_offsets[doc_ids[0]] == start:
            states = None  # a carried state continues the window's first document: not when one starts here
        with amp:
            logits, states = model(chunk[None, :-1], seq_idx=seq_idx, states=states, return_states=True)
        nll = F.cross_entropy(logits[0].float(), chunk[1:], reduction="none").double().cpu().numpy()
        target_docs = doc_ids[1:]
        np.add.at(loss_per_doc, target_docs, nll)
        np.add.at(tokens_per_doc, target_docs, 1)
    model.train(was_training)
    return summarize(dataset, loss_per_doc, tokens_per_doc)


def summarize(dataset: IndexedDataset, loss_per_doc: np.ndarray, tokens_per_doc: np.ndarray) -> dict:
    scored = tokens_per_doc > 0
    bytes_per_doc = np.asarray(dataset.utf8_bytes, dtype=np.int64)
    subset_ids = np.asarray(dataset.subset_ids)

    def row(mask: np.ndarray) -> dict:
        mask = mask & scored
        tokens, loss_sum, n_bytes = int(tokens_per_doc[mask].sum()), float(loss_per_doc[mask].sum()), \
            int(bytes_per_doc[mask].sum())
        loss = loss_sum / max(tokens, 1)
        return {"documents": int(mask.sum()), "tokens": tokens, "bytes": n_bytes, "loss": loss,
                "ppl": math.exp(loss), "bpb": loss_sum / (max(n_bytes, 1) * math.log(2))}

    subsets = {name: row(subset_ids == i) for i, name in enumerate(dataset.subset_names) if (subset_ids == i).any()}
    return {"overall": row(np.ones_like(scored)), "subsets": subsets}


def format_table(results: dict) -> str:
    lines = [f"{'subset':<24} {'docs':>7} {'tokens':>10} {'loss':>8} {'ppl':>9} {'bpb':>7}"]
    rows = list(results["subsets"].items()) + [("overall", results["overall"])]
    for name, r in rows:
        lines.append(f"{name:<24} {r['documents']:>7} {r['tokens']:>10} {r['loss']:>8.4f} {r['ppl']:>9.2f} "
                     f"{r['bpb']:>7.4f}")
    return "\n".join(lines)
