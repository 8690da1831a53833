"""Index arrays (blend orders, epoch shuffles) built once, saved as .npy and memory-mapped."""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np

from mamba_train.data.indexed import DataError


def cached_array(cache_dir: str | os.PathLike | None, kind: str, key: dict, build: Callable[[], np.ndarray]
                 ) -> np.ndarray:
    """build() once per key, saved as `<cache_dir>/<kind>-<hash>.npy` and memory-mapped
    afterwards; without a cache_dir, just build(). Writing is atomic (a temp file and a
    rename), so ranks that race build the same bytes and never read a partial file."""
    if cache_dir is None:
        return build()
    cache_dir = Path(cache_dir)
    text = json.dumps(key, sort_keys=True)
    path = cache_dir / f"{kind}-{hashlib.sha256(text.encode()).hexdigest()[:20]}.npy"
    if not path.is_file():
        cache_dir.mkdir(parents=True, exist_ok=True)
        array = build()
        # a unique temp name: ranks on several nodes may share the directory (and a pid)
        tmp = path.with_name(f"{path.name}.tmp-{uuid.uuid4().hex}")
        with open(tmp, "wb") as f:
            np.save(f, array)
        path.with_suffix(".json").write_text(text + "\n")  # what the index was built from, for people
        os.replace(tmp, path)
    try:
        return np.load(path, mmap_mode="r")
    except (OSError, ValueError) as error:
        raise DataError(f"{path}: unreadable cached index ({error}); delete it to rebuild") from None
