"""Jobs in worker processes (a package's merged variants, side by side): results in the jobs' order, log lines
through the parent's log with the job's name, a job's exception raised in the parent as it was raised, the number
of workers from what was asked, the cores and the memory."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from lora_export.io.errors import InputError
from lora_export.io.jsonio import read_json_object
from lora_export.io.processes import cores, run_in_processes, worker_count, worker_log


def test_results_in_order_and_logs_named() -> None:
    lines: list[str] = []
    jobs = [("fact", math.factorial, (5,)), ("say", worker_log, ("hello",)), ("pow", math.pow, (2, 10))]
    assert run_in_processes(jobs, 2, lines.append) == [120, None, 1024.0]
    assert lines == ["[say] hello"]


def test_a_jobs_error_is_raised_here(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.json"
    with pytest.raises(InputError, match="nowhere.json is missing: give it"):
        run_in_processes([("ok", math.factorial, (3,)), ("bad", read_json_object, (missing, "give it"))], 2, print)


def test_a_worker_that_dies_is_an_error_not_a_hang() -> None:
    import os

    from lora_export.io.errors import WorkerError

    with pytest.raises(WorkerError, match="ended without a result") as e:
        run_in_processes([("dies", os._exit, (9,)), ("ok", math.factorial, (3,))], 2, print)
    assert e.value.exit_code == 3


def test_worker_count() -> None:
    assert worker_count(5, 1, asked=3) == 3
    assert worker_count(2, 1, asked=8) == 2  # never more workers than jobs
    assert worker_count(1, 1) == 1
    assert worker_count(64, 1) == min(cores(), 64)  # a byte each: the cores decide
    assert worker_count(64, 2**60) == 1  # an exabyte each: no memory for a second


def test_workers_is_refused_where_nothing_is_built(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from lora_export.cli import main

    (tmp_path / "v.yaml").write_text("variants:\n  a: {adapters: [a]}\n")
    cases = {
        ("package", "--check", str(tmp_path), "--workers", "2"): "leave out --only, --assemble and --workers",
        ("package", "--assemble", str(tmp_path), "-o", str(tmp_path / "o"), "--workers", "2"): "applies when a package",
        (
            "package",
            str(tmp_path),
            "--variants",
            str(tmp_path / "v.yaml"),
            "-o",
            str(tmp_path / "o"),
            "--workers",
            "0",
        ): "0 is not in the range x>=1",
    }
    for args, message in cases.items():
        r = CliRunner().invoke(main, list(args))
        assert r.exit_code == 2 and message in r.output, (args, r.output)
    assert not (tmp_path / "o").exists()


def test_job_threads() -> None:
    from lora_export.io.processes import job_threads

    assert [job_threads(i, 3, 2, 2) for i in range(3)] == [1, 1, 2]  # the third runs alone: both cores
    assert [job_threads(i, 10, 2, 2) for i in range(10)] == [1] * 10
    assert [job_threads(i, 5, 3, 6) for i in range(5)] == [2, 2, 2, 3, 3]
    assert job_threads(0, 4, 4, 2) == 1  # more workers than cores: one thread each, never none


def _warm() -> None:
    import os

    os.environ["LORA_EXPORT_TEST_WARMED"] = str(os.getpid())


def _state() -> tuple[str | None, int | None, str]:
    import os
    import tempfile

    from lora_export.io import processes

    return os.environ.get("LORA_EXPORT_TEST_WARMED"), processes.RUNTIME_THREADS, tempfile.gettempdir()


def test_a_pool_started_early_warms_its_workers_and_leaves_no_temporary_files() -> None:
    import os

    from lora_export.io.processes import WorkerPool

    with WorkerPool(2, print, _warm) as pool:
        got = pool.run([("a", _state, ()), ("b", _state, ()), ("c", _state, ())])
    assert all(warmed is not None and warmed.isdigit() for warmed, _, _ in got)  # warm ran before the jobs
    assert [threads for _, threads, _ in got] == [max(1, cores() // 2)] * 2 + [cores()]
    temp = {t for _, _, t in got}
    assert len(temp) == 1 and os.path.basename(next(iter(temp))).startswith("lora-export-workers-")
    assert not any(os.path.exists(t) for t in temp)


def _temp_then_die(path: str) -> None:
    import os
    import tempfile

    Path(path).write_text(tempfile.mkdtemp())
    os._exit(9)


def test_a_killed_workers_temporary_files_are_removed(tmp_path: Path) -> None:
    from lora_export.io.errors import WorkerError

    said = tmp_path / "said"
    with pytest.raises(WorkerError):
        run_in_processes([("dies", _temp_then_die, (str(said),))], 1, print)
    left = Path(said.read_text())
    assert left.name.startswith("tmp") and not left.parent.exists()


def _parent_and_modules() -> tuple[int, bool]:
    import os
    import sys

    return os.getppid(), "colorsys" in sys.modules


def test_preloaded_modules_are_imported_once_in_a_forkserver() -> None:
    import multiprocessing
    import os

    from lora_export.io.processes import WorkerPool

    with WorkerPool(2, print, preload=["colorsys"]) as pool:
        got = pool.run([("a", _parent_and_modules, ()), ("b", _parent_and_modules, ())])
    assert all(preloaded for _, preloaded in got)
    if "forkserver" in multiprocessing.get_all_start_methods():  # forked from the server, not spawned by this process
        assert {parent for parent, _ in got} != {os.getpid()}
