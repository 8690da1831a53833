"""Who writes a checkpoint's files: the training thread itself, or one background thread
while training goes on (`checkpoint.async_save`).

A save first copies the state it writes to CPU: the only part that blocks training when
the write runs in the background. Then the files, the manifest, the rename and `latest`
are written by `CheckpointWriter.submit`. One save is in flight at a time: the next save,
the end of training and a stop on a signal `wait()` for it first, and `wait()` re-raises
its error, so a failed write is never lost (at worst it surfaces at exit).

The ranks of a parallel run write in their own threads, where no collective may run
(those belong to the training thread, in order): each rank leaves a marker file in the
checkpoint's temporary directory when its files are written, and rank 0's thread waits
for all markers before it publishes the checkpoint (`mark_rank_done`, `wait_for_ranks`).
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Callable

from mamba_train.checkpoint.store import CheckpointError, write_json


class CheckpointWriter:
    def __init__(self, background: bool = False, log: Callable[[str], None] = print):
        self.background, self.log = background, log
        # one row per save: {"checkpoint", "write_s"}, and "blocking_s" once the caller adds it
        self.records: list[dict] = []
        self._thread: threading.Thread | None = None
        self._error: tuple[str, BaseException] | None = None

    def submit(self, name: str, write: Callable[[], None]) -> dict:
        """Run `write` (files, manifest, rename, `latest`): here, or in the background after
        the previous save has finished. Returns the save's record."""
        self.wait()
        record = {"checkpoint": name, "write_s": None}
        self.records.append(record)
        if not self.background:
            started = time.perf_counter()
            write()
            record["write_s"] = time.perf_counter() - started
            return record

        def run() -> None:
            started = time.perf_counter()
            try:
                write()
            except BaseException as err:  # kept for wait(), which re-raises it in the training thread
                self._error = (name, err)
                return
            record["write_s"] = time.perf_counter() - started
            self.log(f"checkpoint {name}: written in {record['write_s']:.2f} s in the background")

        self._thread = threading.Thread(target=run, name=f"checkpoint-writer-{name}")
        self._thread.start()
        return record

    def wait(self) -> None:
        """Until the save in flight (if any) has finished; raises CheckpointError if it failed."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            (name, error), self._error = self._error, None
            raise CheckpointError(f"writing checkpoint {name} in the background failed: "
                                  f"{type(error).__name__}: {error}") from error


MARKER = ".rank{:05d}.done.json"


def mark_rank_done(directory: Path, rank: int, content: dict) -> None:
    """Say that `rank`'s part of the save in `directory` is over: `content` holds what rank
    0 needs ({"files": …}), or {"error": message} if the write failed."""
    marker = directory / MARKER.format(rank)
    partial = marker.with_name(marker.name + ".partial")
    write_json(partial, content)
    os.replace(partial, marker)  # rank 0 never reads half a marker


def wait_for_ranks(directory: Path, world: int, timeout_s: float, what: str) -> list[dict]:
    """Every rank's marker content, by rank, once all are there (then the markers are
    removed: the checkpoint holds exactly what a blocking save writes). Raises
    CheckpointError naming the rank whose write failed, or the ranks missing at `timeout_s`."""
    markers = [directory / MARKER.format(rank) for rank in range(world)]
    contents: list[dict | None] = [None] * world
    deadline = time.monotonic() + timeout_s
    while True:
        for rank, marker in enumerate(markers):
            if contents[rank] is None and marker.is_file():
                contents[rank] = json.loads(marker.read_text())
                if "error" in contents[rank]:
                    raise CheckpointError(f"{what} failed on rank {rank}: {contents[rank]['error']}")
        missing = [rank for rank, content in enumerate(contents) if content is None]
        if not missing:
            break
        if time.monotonic() > deadline:
            raise CheckpointError(f"{what}: ranks {missing} did not finish writing their files within "
                                  f"{timeout_s:.0f} s (parallel.timeout_minutes)")
        time.sleep(0.005)
    for marker in markers:
        marker.unlink()
    return contents
