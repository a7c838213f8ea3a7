"""sha256 of files and of streamed writes (computed from the pieces a sequential reader already has). No torch here:
`package --check` hashes files too."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

CHUNK_BYTES = 4 * 1024 * 1024  # one streamed piece: fits in cache, large enough that Python overhead is noise


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            h.update(chunk)
    return h.hexdigest()


_WRITTEN: dict[tuple[int, int, int, int], str] = {}  # (device, inode, size, mtime_ns) → sha256


def _key(path: Path) -> tuple[int, int, int, int]:
    st = path.stat()
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def sha256_written(path: Path) -> str:
    """sha256 of a file this process wrote, for its report or manifest: a file met again unchanged (the same inode,
    size and modification time: a hard link, a file renamed into place, or a folder listed by a merged variant's
    report and then by the package's manifest) is not read twice. Checks of what others wrote read the bytes
    (`sha256_file`)."""
    key = _key(path)
    if key not in _WRITTEN:
        _WRITTEN[key] = sha256_file(path)
    return _WRITTEN[key]


def written_hashes() -> dict[tuple[int, int, int, int], str]:
    """What this process has hashed, for a parent process to adopt (`adopt_written`): a worker's files."""
    return dict(_WRITTEN)


def adopt_written(hashes: dict[tuple[int, int, int, int], str]) -> None:
    _WRITTEN.update(hashes)


def remember_written(path: Path, sha256: str) -> None:
    """The sha256 of a file this process has just written and closed, hashed from the bytes as they were written."""
    _WRITTEN[_key(path)] = sha256


class FileHasher:
    """sha256 of a file computed from the pieces a sequential reader already has, filling gaps from disk."""

    def __init__(self, path: Path):
        self.path = path
        self._h = hashlib.sha256()
        self._pos = 0

    def feed(self, offset: int, data: Any) -> None:
        if offset < self._pos:
            raise RuntimeError(f"{self.path}: hashed out of order ({offset} < {self._pos})")
        if offset > self._pos:
            self._fill(offset)
        mv = (
            memoryview(data) if isinstance(data, bytes | bytearray | memoryview) else memoryview(data.numpy())
        )  # a tensor
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
