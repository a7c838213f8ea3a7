"""Background work beside the merge: an ordered single-thread worker (writes in order, bounded memory), and checks that
re-read written shards while the next one merges and report their problems at the end."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any


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
