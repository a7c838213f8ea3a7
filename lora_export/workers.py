"""Hashing and background workers: sha256 of files and of streamed writes, an ordered single-thread worker, and
checks that run beside the merge (re-reading written shards) and report problems at the end."""

from __future__ import annotations

import hashlib
import queue
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

CHUNK_BYTES = 4 * 1024 * 1024  # one streamed piece: fits in cache, large enough that Python overhead is noise


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            h.update(chunk)
    return h.hexdigest()


class FileHasher:
    """sha256 of a file computed from the pieces a sequential reader already has, filling gaps from disk."""

    def __init__(self, path: Path):
        self.path = path
        self._h = hashlib.sha256()
        self._pos = 0

    def feed(self, offset: int, data: torch.Tensor | bytes) -> None:
        if offset < self._pos:
            raise RuntimeError(f"{self.path}: hashed out of order ({offset} < {self._pos})")
        if offset > self._pos:
            self._fill(offset)
        mv = memoryview(data.numpy()) if isinstance(data, torch.Tensor) else memoryview(data)
        self._h.update(mv)
        self._pos += mv.nbytes

    def _fill(self, until: int | None) -> None:
        with self.path.open("rb") as f:
            f.seek(self._pos)
            while until is None or self._pos < until:
                chunk = f.read(CHUNK_BYTES if until is None else min(CHUNK_BYTES, until - self._pos))
                if not chunk:
                    break
                self._h.update(chunk)
                self._pos += len(chunk)

    def hexdigest(self) -> str:
        self._fill(None)
        return self._h.hexdigest()


class OrderedWorker:
    """One background thread running submitted calls in order, with a bounded queue (bounded memory)."""

    def __init__(self, name: str, depth: int = 8):
        self._q: queue.Queue[tuple[Callable[..., Any], tuple[Any, ...]] | None] = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (job := self._q.get()) is not None:
            if self._error is None:
                try:
                    job[0](*job[1])
                except BaseException as e:  # re-raised in the submitting thread
                    self._error = e

    def submit(self, fn: Callable[..., Any], *args: Any) -> None:
        if self._error is not None:
            raise self._error
        self._q.put((fn, args))

    def close(self) -> None:
        self._q.put(None)
        self._thread.join()
        if self._error is not None:
            raise self._error


class BackgroundChecks:
    """Runs re-read checks in threads as shards complete, so they overlap the merge of the next shard."""

    def __init__(self) -> None:
        self._threads: list[threading.Thread] = []
        self._problems: list[str] = []
        self._lock = threading.Lock()

    def start(self, fn: Callable[..., list[str]], *args: Any) -> None:
        def run() -> None:
            try:
                found = fn(*args)
            except Exception as e:  # reported like any other disagreement
                found = [f"re-read failed: {type(e).__name__}: {e}"]
            with self._lock:
                self._problems.extend(found)

        self._threads.append(threading.Thread(target=run, daemon=True))
        self._threads[-1].start()

    def wait(self) -> list[str]:
        for t in self._threads:
            t.join()
        return list(self._problems)
