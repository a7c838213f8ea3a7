"""Independent jobs in worker processes: a package's merged variants are checked side by side where the machine has
the cores and the memory for it. Each worker is a fresh interpreter (spawn: no copy of this process's models or
threads) with its share of the cores; its log lines come back through a queue, its result or exception through the
pool, in the order the jobs were given. A worker that dies (killed for memory, say) is an error here, not a hang. No
torch here: the jobs import what they need."""

from __future__ import annotations

import multiprocessing
import os
import queue
import signal
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

from .errors import WorkerError

RUNTIME_THREADS: int | None = None  # the threads a runtime session may use in this process (a worker's share)

_log_queue: Any = None
_name = ""


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def available_memory() -> int | None:
    """MemAvailable (bytes) on Linux; None where it cannot be read (one worker then)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def worker_count(jobs: int, bytes_per_job: int, asked: int | None = None) -> int:
    """How many workers: `asked` when given (at most one per job); else one per core, as many as the available
    memory holds at `bytes_per_job` each, and never more than the jobs."""
    if asked is not None:
        return max(1, min(asked, jobs))
    memory = available_memory()
    fits = memory // max(bytes_per_job, 1) if memory is not None else 1
    return max(1, min(cores(), jobs, fits))


def _init(log_queue: Any, threads: int) -> None:
    global _log_queue, RUNTIME_THREADS
    _log_queue, RUNTIME_THREADS = log_queue, threads
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's: it stops the workers (exit 130, no traces)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):  # read when torch is imported, which the first job does
        os.environ[var] = str(threads)


def worker_log(message: str) -> None:
    """A job's log line, sent to the parent's log with the job's name."""
    _log_queue.put(f"[{_name}] {message}")


def _call(name: str, fn: Callable[..., Any], args: tuple[Any, ...]) -> Any:
    global _name
    _name = name
    return fn(*args)


def run_in_processes(
    jobs: Sequence[tuple[str, Callable[..., Any], tuple[Any, ...]]], workers: int, log: Callable[[str], None]
) -> list[Any]:
    """Each job (name, module-level function, picklable args) in a pool of `workers` processes; the results in the
    jobs' order. A job's exception is raised here (the others are stopped), and so is an interrupt."""
    context = multiprocessing.get_context("spawn")
    log_queue = context.Queue()
    threads = max(1, cores() // workers)
    pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_init, initargs=(log_queue, threads))
    futures: list[Future[Any]] = []
    results = None
    try:
        futures = [pool.submit(_call, *job) for job in jobs]
        pending: set[Future[Any]] = set(futures)
        while pending:
            done, pending = wait(pending, timeout=0.2, return_when=FIRST_EXCEPTION)
            _drain(log_queue, log)
            for f in done:
                f.result()  # raises the job's exception
        results = [f.result() for f in futures]
        return results
    except BrokenProcessPool:
        raise WorkerError(
            "a worker process checking the variants ended without a result (killed for lack of memory, or a script "
            "calling lora_export without `if __name__ == '__main__':`, which worker processes need); "
            "use --workers 1 (workers=1) to check them one after another in this process"
        ) from None
    finally:
        if results is None:  # an error or Ctrl-C: the other jobs are stopped, not waited for
            for f in futures:
                f.cancel()
            for process in list((getattr(pool, "_processes", None) or {}).values()):
                process.terminate()
        pool.shutdown(wait=True, cancel_futures=True)
        _drain(log_queue, log)
        log_queue.close()
        log_queue.join_thread()


def _drain(log_queue: Any, log: Callable[[str], None]) -> None:
    try:
        while True:
            log(log_queue.get_nowait())
    except queue.Empty:
        pass
