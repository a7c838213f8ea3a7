"""Independent jobs in worker processes: a package's merged variants are checked side by side where the machine has
the cores and the memory for it. Each worker is a fresh interpreter (no copy of this process's models or threads):
forked from a forkserver that imported what the jobs need once (`preload`), or spawned where there is none. The
workers start while this process does other work (`WorkerPool`); each job runs with its share of the cores; its log
lines come back through a queue, its result or exception through the pool, in the order the jobs were given. A
worker that dies (killed for memory, say) is an error here, not a hang. No torch here: the jobs import what they
need."""

from __future__ import annotations

import multiprocessing
import os
import queue
import shutil
import signal
import sys
import tempfile
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from types import TracebackType
from typing import Any

from .errors import WorkerError
from .outputs import TEMP_PREFIX

RUNTIME_THREADS: int | None = None  # the threads a runtime session may use in this process (a worker's share)

Job = tuple[str, Callable[..., Any], tuple[Any, ...]]  # name, module-level function, picklable args
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


def job_threads(index: int, jobs: int, workers: int, machine_cores: int) -> int:
    """The threads of job `index` of `jobs` on `workers` workers: a worker's share of the cores, except in the last
    round, where fewer jobs than workers are left and each takes the share of the workers that have none."""
    last_round = jobs % workers
    running = last_round if last_round and index >= jobs - last_round else workers
    return max(1, machine_cores // running)


def _init(log_queue: Any, threads: int, temp: str, warm: Callable[[], None] | None) -> None:
    global _log_queue, RUNTIME_THREADS
    _log_queue, RUNTIME_THREADS = log_queue, threads
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's: it stops the workers (exit 130, no traces)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):  # read when torch is imported
        os.environ[var] = str(threads)
    os.environ["TMPDIR"] = tempfile.tempdir = temp  # removed by the parent, even when this worker is killed
    if warm is not None:
        warm()


def _started() -> None:
    """A first job that only makes the pool start a worker (and run its initializer) now."""


def _call(name: str, threads: int, fn: Callable[..., Any], args: tuple[Any, ...]) -> Any:
    global _name, RUNTIME_THREADS
    _name, RUNTIME_THREADS = name, threads
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(threads)
    return fn(*args)


def worker_log(message: str) -> None:
    """A job's log line, sent to the parent's log with the job's name."""
    _log_queue.put(f"[{_name}] {message}")


class WorkerPool:
    """`workers` worker processes, started on entering (`preload`: modules imported once, in the forkserver; each
    worker runs `warm`, a module-level function, first: what would otherwise delay its first job), stopped on
    leaving; on an error or Ctrl-C the jobs still running are stopped, not waited for, and the workers' temporary
    files removed."""

    def __init__(
        self,
        workers: int,
        log: Callable[[str], None],
        warm: Callable[[], None] | None = None,
        preload: Sequence[str] = (),
    ) -> None:
        self.workers, self.log, self.warm, self.preload = workers, log, warm, list(preload)
        self._futures: list[Future[Any]] = []

    def __enter__(self) -> WorkerPool:
        context: Any = multiprocessing.get_context("spawn")
        if self.preload and "forkserver" in multiprocessing.get_all_start_methods():
            context = multiprocessing.get_context("forkserver")  # the modules imported once, in its server
            context.set_forkserver_preload(self.preload)
        self._queue = context.Queue()
        self.temp = Path(tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}workers-"))  # the workers' temporary files, and ours
        initargs = (self._queue, max(1, cores() // self.workers), str(self.temp), self.warm)
        self._pool = ProcessPoolExecutor(self.workers, mp_context=context, initializer=_init, initargs=initargs)
        self._start_error: BaseException | None = None
        self._starting = threading.Thread(target=self._start, name="lora-export-workers", daemon=True)
        self._starting.start()  # a forkserver imports its modules first: this process goes on meanwhile
        return self

    def _start(self) -> None:
        try:
            self._futures = [self._pool.submit(_started) for _ in range(self.workers)]  # one spawned per submit
        except BaseException as e:  # noqa: BLE001 - raised where the pool is next used
            self._start_error = e

    def _wait_started(self) -> None:
        self._starting.join()
        if self._start_error is not None:
            raise self._start_error

    def run(self, jobs: Sequence[Job]) -> list[Any]:
        """Each job in the pool, with its share of the cores; the results in the jobs' order. A job's exception is
        raised here as it was raised (the other jobs are then stopped); a worker that died is a WorkerError."""
        self._wait_started()
        n, machine_cores = len(jobs), cores()
        futures = [
            self._pool.submit(_call, name, job_threads(i, n, self.workers, machine_cores), fn, args)
            for i, (name, fn, args) in enumerate(jobs)
        ]
        self._futures += futures
        pending: set[Future[Any]] = set(self._futures)
        try:
            while pending:
                done, pending = wait(pending, timeout=0.2, return_when=FIRST_EXCEPTION)
                self.drain()
                for f in done:
                    f.result()  # raises the job's exception
        except BrokenProcessPool:
            raise WorkerError(
                "a worker process checking the variants ended without a result (killed for lack of memory, or a "
                "script calling lora_export without `if __name__ == '__main__':`, which worker processes need); "
                "use --workers 1 (workers=1) to check them one after another in this process"
            ) from None
        self._futures = []
        return [f.result() for f in futures]

    def drain(self) -> None:
        """The workers' log lines so far, through the log."""
        _drain(self._queue, self.log)

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self._starting.join()
        try:
            if kind is not None:  # an error or Ctrl-C: the jobs still running are stopped, not waited for
                for f in self._futures:
                    f.cancel()
                for process in list((getattr(self._pool, "_processes", None) or {}).values()):
                    process.terminate()
            self._pool.shutdown(wait=True, cancel_futures=True)
            self.drain()
            self._queue.close()
            self._queue.join_thread()
        finally:
            shutil.rmtree(self.temp, ignore_errors=True)


def run_in_processes(jobs: Sequence[Job], workers: int, log: Callable[[str], None]) -> list[Any]:
    """Each job (name, module-level function, picklable args) in a pool of `workers` processes; the results in the
    jobs' order. A job's exception is raised here (the others are stopped), and so is an interrupt."""
    with WorkerPool(workers, log) as pool:
        return pool.run(jobs)


def _drain(log_queue: Any, log: Callable[[str], None]) -> None:
    try:
        while True:
            log(log_queue.get_nowait())
    except queue.Empty:
        pass
