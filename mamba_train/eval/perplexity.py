"""Token perplexity and bits-per-byte of a model on an indexed dataset, overall and per
subset (the Pile paper's table, Gao et al. 2020, Table 2), distributed over ranks.

What a document's score is: document k (tokens t_1..t_n and its EOD) is read from a
zero state as `EOD, t_1, ..., t_n` and scored on predicting `t_1, ..., t_n, EOD`: the
EOD that ends the previous document serves as its start token (a virtual EOD before the
first document). So every token of every document is predicted, each document's loss
depends on that document alone, and the result is the same whatever the window, the
number of rows or ranks: the sum over documents of what evaluating each one whole gives.

How it is computed: the token stream is read in windows and the recurrent state is
carried from window to window, so long documents need no sliding-window overlap (the
Mamba advantage over attention). `seq_idx` resets the state at each document start
inside a window; a window that starts exactly at a document start gets no carried state
(a carried state continues the window's first document: docs/design-notes.md). Ranks,
and rows within a rank, take contiguous runs of whole documents of about equal tokens.

bits-per-byte = summed loss (nats) / (UTF-8 bytes · ln 2), i.e. loss · tokens / (bytes · ln 2).
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from mamba_train.data import DataError, IndexedDataset


@torch.no_grad()
def evaluate(model, dataset: IndexedDataset, window: int = 2048, max_tokens: int | None = None,
             device: torch.device | str = "cpu", autocast_dtype: torch.dtype | None = None, rows: int = 1,
             eod_id: int | None = None, group: dist.ProcessGroup | None = None, progress: bool = False) -> dict:
    """{"overall": row, "subsets": {name: row}, ...}, row = documents, tokens, bytes, loss, ppl, bpb.

    With torch.distributed initialized, each rank of `group` scores its share and the
    per-document sums are all-reduced: every rank returns the full result.
    `max_tokens`: only the leading documents that fit in this many tokens (at least one),
    always whole, so their bytes, and so bits-per-byte, stay exact. `progress`: a bar of the
    windows scored on this rank, on a terminal."""
    if dataset.utf8_bytes is None:
        raise DataError(f"{dataset.docs_path}: missing; bits-per-byte and per-subset results need the sidecar "
                        "that `mamba-train prep` writes")
    vocab_size = getattr(getattr(model, "cfg", None), "vocab_size", None)
    if vocab_size and dataset.max_token_id() >= vocab_size:
        raise DataError(f"{dataset.bin_path}: token id {dataset.max_token_id()} does not fit the model's vocabulary "
                        f"of {vocab_size}; the data was tokenized with another tokenizer")
    n_docs = _leading_documents(dataset, max_tokens)
    rank, world = (dist.get_rank(group), dist.get_world_size(group)) if dist.is_initialized() else (0, 1)
    first, last = _split_by_tokens(dataset, 0, n_docs, world)[rank]
    loss_per_doc, tokens_per_doc = score_documents(model, dataset, first, last, window=window, rows=rows,
                                                   device=device, autocast_dtype=autocast_dtype, eod_id=eod_id,
                                                   progress=progress)
    if world > 1:
        loss_per_doc, tokens_per_doc = _all_reduce_sum(group, device, loss_per_doc, tokens_per_doc)
    results = summarize(dataset, loss_per_doc[:n_docs], tokens_per_doc[:n_docs])
    results.update({"window": window, "ranks": world, "rows": rows, "documents_total": len(dataset)})
    return results


@torch.no_grad()
def score_documents(model, dataset: IndexedDataset, first: int, last: int, window: int = 2048, rows: int = 1,
                    device: torch.device | str = "cpu", autocast_dtype: torch.dtype | None = None,
                    eod_id: int | None = None, progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(loss_per_doc (n_docs,) float64 summed nats, tokens_per_doc (n_docs,) int64), filled
    for documents [first, last) and zero elsewhere. `rows` runs of documents go side by
    side as one batch, each with its own carried state."""
    if window <= 0 or rows <= 0:
        raise ValueError(f"window and rows must be positive, found window={window}, rows={rows}")
    device = torch.device(device)
    n_docs = len(dataset)
    loss_per_doc = np.zeros(n_docs, dtype=np.float64)
    tokens_per_doc = np.zeros(n_docs, dtype=np.int64)
    if last <= first:
        return loss_per_doc, tokens_per_doc
    if eod_id is None:  # every document `prep` writes ends with the EOD id
        eod_id = int(dataset[first][-1])
    was_training = model.training
    model.eval()
    offsets = np.asarray(dataset.doc_offsets, dtype=np.int64)  # document k's inputs start here
    stream = dataset.token_stream()
    # Positions are "virtual": input position p reads stream[p - 1] (the EOD before the
    # document, a virtual EOD for p = 0) and predicts stream[p]; document k owns the
    # positions [offsets[k], offsets[k] + length[k]).
    ranges = [(int(offsets[a]), int(offsets[b - 1]) + int(dataset.doc_lengths[b - 1]))
              for a, b in _split_by_tokens(dataset, first, last, rows) if b > a]
    amp = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else nullcontext()
    states = None
    steps = max(-(-(stop - start) // window) for start, stop in ranges)
    # disable=None: tqdm draws only on a terminal
    for step in tqdm(range(steps), desc="scoring", unit="window", disable=None if progress else True):
        windows = [(start + step * window, min(stop, start + (step + 1) * window)) for start, stop in ranges]
        length = max(max(b - a, 0) for a, b in windows)
        inputs = np.full((len(ranges), length), eod_id, dtype=np.int64)
        targets = np.zeros((len(ranges), length), dtype=np.int64)
        doc_ids = np.full((len(ranges), length), n_docs, dtype=np.int64)  # n_docs: padding, never scored
        fresh = np.zeros(len(ranges), dtype=bool)  # rows whose window starts a document: no carried state
        for row, (a, b) in enumerate(windows):
            if b <= a:
                continue
            positions = np.arange(a, b)
            if a > 0:
                inputs[row, : b - a] = stream[a - 1:b - 1]
            else:  # the virtual EOD before the first document
                inputs[row, 1:b] = stream[: b - 1]
            targets[row, : b - a] = stream[a:b]
            doc_ids[row, : b - a] = np.searchsorted(offsets, positions, side="right") - 1
            fresh[row] = offsets[doc_ids[row, 0]] == a
        states = _reset_rows(states, fresh, device)
        with amp:
            logits, states = model(torch.from_numpy(inputs).to(device),
                                   seq_idx=torch.from_numpy(doc_ids.astype(np.int32)).to(device),
                                   states=states, return_states=True)
        # logits: (rows, length, padded vocab); padding positions are scored and dropped
        nll = F.cross_entropy(logits.float().flatten(0, 1), torch.from_numpy(targets).to(device).flatten(),
                              reduction="none").double().cpu().numpy()
        scored = doc_ids.ravel() < n_docs
        np.add.at(loss_per_doc, doc_ids.ravel()[scored], nll[scored])
        np.add.at(tokens_per_doc, doc_ids.ravel()[scored], 1)
    model.train(was_training)
    return loss_per_doc, tokens_per_doc


def _reset_rows(states, fresh: np.ndarray, device: torch.device):
    """Zero the carried state of the rows in `fresh` (a zero state is exactly no state:
    the SSM adds nothing and the conv sees the zero padding it uses anyway)."""
    if states is None or not fresh.any():
        return states
    keep = torch.from_numpy(~fresh).to(device)
    return [type(state)(*(tensor * keep.view(-1, *([1] * (tensor.dim() - 1))).to(tensor.dtype)
                          for tensor in state)) for state in states]


def _leading_documents(dataset: IndexedDataset, max_tokens: int | None) -> int:
    if max_tokens is None:
        return len(dataset)
    ends = np.cumsum(dataset.doc_lengths, dtype=np.int64)
    return max(1, int(np.searchsorted(ends, max_tokens, side="right"))) if len(dataset) else 0


def _split_by_tokens(dataset: IndexedDataset, first: int, last: int, parts: int) -> list[tuple[int, int]]:
    """`parts` contiguous runs of whole documents [a, b) covering [first, last), of about
    equal tokens (some may be empty when there are fewer documents than parts)."""
    ends = np.cumsum(np.asarray(dataset.doc_lengths[first:last], dtype=np.int64))
    total = int(ends[-1]) if ends.size else 0
    cuts = [first] + [first + int(np.searchsorted(ends, total * k / parts, side="left")) + 1 if total else first
                      for k in range(1, parts)] + [last]
    cuts = np.minimum(np.maximum.accumulate(cuts), last).tolist()
    return list(zip(cuts[:-1], cuts[1:]))


def _all_reduce_sum(group, device, *arrays: np.ndarray) -> list[np.ndarray]:
    # NCCL reduces only device tensors; gloo takes CPU ones
    on = torch.device(device) if dist.get_backend(group) == "nccl" else torch.device("cpu")
    out = []
    for array in arrays:
        tensor = torch.from_numpy(np.ascontiguousarray(array)).to(on)
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
        out.append(tensor.cpu().numpy())
    return out


def summarize(dataset: IndexedDataset, loss_per_doc: np.ndarray, tokens_per_doc: np.ndarray) -> dict:
    n = len(loss_per_doc)
    scored = tokens_per_doc > 0
    bytes_per_doc = np.asarray(dataset.utf8_bytes[:n], dtype=np.int64)
    subset_ids = np.asarray(dataset.subset_ids[:n])

    def row(mask: np.ndarray) -> dict:
        mask = mask & scored
        tokens, loss_sum = int(tokens_per_doc[mask].sum()), float(loss_per_doc[mask].sum())
        n_bytes = int(bytes_per_doc[mask].sum())
        loss = loss_sum / max(tokens, 1)
        return {"documents": int(mask.sum()), "tokens": tokens, "bytes": n_bytes, "loss": loss,
                "ppl": math.exp(loss), "bpb": loss_sum / (max(n_bytes, 1) * math.log(2)),
                "tokens_per_byte": tokens / max(n_bytes, 1)}

    subsets = {name: row(subset_ids == i) for i, name in enumerate(dataset.subset_names)
               if (scored & (subset_ids == i)).any()}
    return {"overall": row(np.ones_like(scored)), "subsets": subsets}


def format_table(results: dict) -> str:
    """Subsets by name, then the overall row; bits-per-byte is the column to compare
    across tokenizers (the Pile paper reports it per component)."""
    lines = [f"{'subset':<24} {'docs':>7} {'tokens':>11} {'MB':>8} {'loss':>7} {'ppl':>9} {'bpb':>7}"]
    rows = sorted(results["subsets"].items()) + [("overall", results["overall"])]
    for name, r in rows:
        lines.append(f"{name:<24} {r['documents']:>7} {r['tokens']:>11} {r['bytes'] / 1e6:>8.2f} {r['loss']:>7.4f} "
                     f"{r['ppl']:>9.2f} {r['bpb']:>7.4f}")
    return "\n".join(lines)
