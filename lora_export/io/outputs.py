"""Output folders: where an output may go, free space, disk errors in one line, the per-output lock, and atomic
folders (written to a hidden sibling, renamed into place when complete; a killed run's leftovers removed next time)."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress
from pathlib import Path
from typing import Any

from .errors import OutputError


def check_output_location(out: Path, inputs: list[Path], overwrite: bool) -> None:
    """Refuse outputs that would overwrite or sit inside an input, or an existing folder without --overwrite."""
    out_r = out.resolve()
    here = Path.cwd().resolve()
    if here == out_r or here.is_relative_to(out_r):
        raise OutputError(
            f"output {out} is {'the current folder' if here == out_r else 'a folder above the current one'}: writing it "
            "would replace the folder you are in; choose an output folder elsewhere (e.g. a new subfolder)"
        )
    for src in inputs:
        src_r = src.resolve()
        if out_r == src_r or out_r.is_relative_to(src_r) or src_r.is_relative_to(out_r):
            raise OutputError(f"output {out} overlaps the input {src}: choose an output folder outside the inputs")
    if out.exists() and not overwrite:
        raise OutputError(f"output {out} already exists: pass --overwrite to replace it, or choose another folder")
    if out.exists() and not out.is_dir():
        raise OutputError(f"output {out} exists and is not a folder")


# Errors of the output disk rather than of this tool: reported in one line with the fix, never as a traceback.
DISK_ERRNOS = {
    errno.ENOSPC: "free space on that disk, or choose an output folder on another one",
    errno.EDQUOT: "free space within your quota, or choose an output folder elsewhere",
    errno.EFBIG: "the file is larger than this file system or process allows (ulimit -f): choose an output folder elsewhere",
    errno.EROFS: "the file system is read-only: choose a writable output folder",
    errno.EACCES: "permission denied: fix the permissions, or choose a writable output folder",
    errno.EPERM: "operation not permitted: fix the permissions, or choose a writable output folder",
}


def disk_error(e: OSError, out: Path) -> OutputError | None:
    """An OutputError naming the file and the fix for an OSError of the output disk; None for any other OSError
    (one naming a file that is not part of this output, say an unreadable input, is not ours to rephrase)."""
    fix = DISK_ERRNOS.get(e.errno or -1)
    name = str(e.filename) if e.filename else None
    # ours: the output, its parent, or a sibling of ours (.OUT.lock, .OUT.partial-…); write() errors carry no name
    if fix is None or (
        name
        and name not in (str(out), str(out.parent))
        and not name.startswith((f"{out}{os.sep}", str(out.parent / f".{out.name}.")))
    ):
        return None
    where = f" ({name})" if name else ""
    return OutputError(f"cannot write {out}{where}: {e.strerror or e}: {fix}{temp_hint(out)}")


def check_free_space(out: Path, nbytes: int, what: str = "") -> None:
    """Refuse before writing when the output's file system has less free space than the output will take."""
    where = out.parent
    while not where.exists() and where != where.parent:
        where = where.parent
    free = shutil.disk_usage(where).free
    if free < nbytes:
        raise OutputError(
            f"{what or f'the output {out}'} needs {nbytes / 1e9:.2f} GB, but its disk has {free / 1e9:.2f} GB free: "
            "free space on that disk, or choose an output folder on another one" + temp_hint(out)
        )


TEMP_PREFIX = "lora-export-"  # every temporary folder of this tool: lora-export-verify-…, lora-export-bench-…


def temp_hint(path: Path) -> str:
    """For a path in one of this tool's temporary folders (verify's float32 copy, bench's merge): where they go and
    how to move them."""
    tmp = Path(tempfile.gettempdir())
    parts = path.relative_to(tmp).parts if path.is_relative_to(tmp) else ()
    return (
        f"; temporary files go to {tmp}: set TMPDIR to a folder on a larger disk"
        if parts and parts[0].startswith(TEMP_PREFIX)
        else ""
    )


@contextmanager
def output_lock(out: Path) -> Iterator[bool]:
    """Hold an exclusive lock on the output name (`.NAME.lock` beside it) for the whole write; yield whether locked.

    A second run for the same output fails at once instead of racing the first to the final rename. The lock is an
    flock, so a killed run releases it; the file is removed when the run ends. On a file system without locks the
    run goes on unguarded (yields False).
    """
    lock_path = out.parent / f".{out.name}.lock"
    while True:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP):  # a file system without locks: write unguarded, as before
                os.close(fd)
                with suppress(OSError):
                    os.unlink(lock_path)
                yield False
                return
            if not isinstance(e, BlockingIOError):
                os.close(fd)
                raise
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
            os.close(fd)
            raise OutputError(
                f"another lora-export run{f' (pid {holder})' if holder else ''} is writing {out}: wait for it to finish, "
                "or choose another output folder"
            ) from None
        try:  # the previous holder may have removed the file between our open and our flock: lock the current one
            current = os.stat(lock_path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            current = False
        if current:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield True
    finally:
        with suppress(OSError):
            os.unlink(lock_path)
        os.close(fd)


def remove_stale_partials(out: Path) -> None:
    """Folders left by killed runs for this output. Only called under output_lock, so no live run owns them."""
    for pattern in (f".{out.name}.partial-*", f".{out.name}.old-*"):
        for stale in out.parent.glob(pattern):
            shutil.rmtree(stale, ignore_errors=True)


class DiscardOutput(Exception):
    """Raised inside `atomic_output_dir` when a check failed: the staged output is removed like any failed run's,
    and the caller returns the failed report it carries (a failed check is a returned report, never an exception
    out of the library)."""

    def __init__(self, report: Any):
        super().__init__("a check failed: the staged output was discarded")
        self.report = report


@contextmanager
def atomic_output_dir(out: Path, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary sibling folder; rename it to `out` only if the block completes.

    An interrupted run leaves only a `.NAME.partial-*` folder, which never looks like a finished output and is
    removed by the next run for the same output. Runs for one output are serialised by output_lock; errors of the
    output disk (full, read-only, no permission) become one OutputError naming the file and the fix.
    """
    parent = out.parent
    if out.is_symlink():
        raise OutputError(
            f"output {out} is a symbolic link (to {os.readlink(out)}): give the real folder, or remove the link"
        )
    created = [p for p in (parent, *parent.parents) if not p.exists()]  # removed again if the run fails
    try:
        with ExitStack() as stack:
            try:
                parent.mkdir(parents=True, exist_ok=True)
                locked = stack.enter_context(output_lock(out))
                if out.exists() and not overwrite:
                    raise OutputError(
                        f"output {out} already exists: pass --overwrite to replace it, or choose another folder"
                    )
                if locked:  # no live run can own them
                    remove_stale_partials(out)
                tmp = parent / f".{out.name}.partial-{os.getpid()}-{secrets.token_hex(4)}"
                tmp.mkdir()
            except OSError as e:
                raise disk_error(e, out) or OutputError(
                    f"cannot create a folder in {parent}: {e.strerror or e}"
                ) from None
            try:
                yield tmp
                _move_into_place(tmp, out, overwrite)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
    except BaseException as e:
        for folder in created:  # innermost first; only what this run made, and only if still empty
            with contextlib.suppress(OSError):
                folder.rmdir()
        if not isinstance(e, OSError) or (converted := disk_error(e, out)) is None:
            raise
        raise converted from None


def _move_into_place(tmp: Path, out: Path, overwrite: bool) -> None:
    """The finished folder renamed to `out` (the old `out` set aside first and removed after, with --overwrite)."""
    try:
        if out.exists():
            if not overwrite:
                raise OutputError(f"output {out} appeared while this run was writing: not replacing it")
            old = out.parent / f".{out.name}.old-{os.getpid()}-{secrets.token_hex(4)}"
            os.rename(out, old)
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
    except OSError as e:
        if disk_error(e, out) is not None:
            raise
        raise OutputError(f"cannot put the finished output in place at {out}: {e.strerror or e}; choose another "
                          "output folder") from None  # fmt: skip
