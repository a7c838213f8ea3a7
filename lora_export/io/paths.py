"""Paths taken from inputs: file names from index files, and links inside model folders, refused when they lead out
of the folder they belong to (a Hugging Face cache snapshot's links to its blobs excepted)."""

from __future__ import annotations

import errno
import os
from pathlib import Path

from .errors import InputError, UnsafeInputError


def safe_child(folder: Path, name: str, what: str) -> Path:
    """Resolve a file name taken from an index file, refusing anything that leaves `folder`."""
    if not name or "/" in name or "\\" in name or name in (".", "..") or name.startswith(".."):
        raise UnsafeInputError(f"{what} names the file {name!r}: only plain file names inside {folder} are allowed")
    return checked_link(folder, folder / name, what)


def checked_link(folder: Path, path: Path, what: str) -> Path:
    """`path` (inside `folder`), refusing a symbolic link — at any depth — that leads out of the folder, and a loop.
    A Hugging Face cache snapshot links each file to ../../blobs/<hash>: that stays inside the cached repo."""
    try:
        target = path.resolve(strict=False)
    except (RuntimeError, OSError) as e:  # a loop
        raise UnsafeInputError(f"{what}: {path} is a symbolic link loop ({e}); replace it with the file") from None
    root = folder.resolve()
    if target == path.absolute() or target.is_relative_to(root):
        return path
    hf_blobs = root.parent.parent / "blobs" if root.parent.name == "snapshots" else None
    if hf_blobs and target.is_relative_to(hf_blobs):
        return path
    raise UnsafeInputError(
        f"{what}: {path.relative_to(folder) if path.is_relative_to(folder) else path} is a symbolic link out of "
        f"{folder} (to {target}): refusing to follow it; copy the file into the folder if you trust it"
    )


def as_path(value: Path | str) -> Path:
    """`value` as a Path, kept as given when it is one already: a folder resolved from a Hub address (model.hub's
    HubFolder) carries the address it came from, which `Path(value)` would drop."""
    return value if isinstance(value, Path) else Path(value)


def probe(path: Path, what: str) -> Path:
    """`path` — from the command line or read from a file (variants.yaml, adapter_config.json, lora_export.json) —
    checked to be one the file system can look up: a symbolic link loop, a name too long for it, a NUL byte or a
    permission error is one InputError naming `what` and the fix. A path that does not exist passes: the caller says
    what was expected there."""
    try:
        os.stat(path)
    except ValueError:  # an embedded NUL byte
        raise InputError(f"{what}: {str(path)!r} contains a NUL byte; give a real path") from None
    except OSError as e:
        if e.errno in (errno.ENOENT, errno.ENOTDIR):
            return path
        if e.errno == errno.ELOOP:
            fix = "a symbolic link loop; point the link at a real file or folder"
        elif e.errno == errno.ENAMETOOLONG:
            fix = "too long for the file system (a name over 255 bytes, or the whole path over 4096); use a shorter one"
        else:
            fix = f"{e.strerror or e}; check its permissions"
        shown = shorten(str(path))
        raise InputError(
            f"{what}: {shown} is {fix}" if e.errno != errno.EACCES else f"{what}: {shown}: {fix}"
        ) from None
    return path


def shorten(text: str, keep: int = 120) -> str:
    """A path or name for a message: at most `keep` characters, the middle elided (…) when longer."""
    return text if len(text) <= keep else f"{text[: keep // 2]}…{text[-keep // 2 :]} ({len(text)} characters)"
